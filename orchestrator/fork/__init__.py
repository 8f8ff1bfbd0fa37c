"""The fork: the pinned upstream, our patch series over it, and its CMake build."""
