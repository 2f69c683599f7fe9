"""The model contract: the manifest, the model file, and how a record becomes model inputs."""
