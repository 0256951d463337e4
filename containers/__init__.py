"""Container images of kubetune: the pinned CPU and GPU Dockerfiles, their hashed locks, and the one map of
image references (:mod:`kubetune.containers.images`) that every component and pipeline reads."""
