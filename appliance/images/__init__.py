"""The image store: artifacts (installer kernels/initrds, ISOs, OS images), verified by sha256."""
