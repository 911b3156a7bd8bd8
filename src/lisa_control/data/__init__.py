"""Training data: image/condition/caption datasets and the procedural tasks of the embedded
default."""
