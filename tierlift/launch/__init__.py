"""Starting ranks: the ``tierlift`` CLI, the torchrun environment, the local and Ray launchers.

Nothing is imported here, so ``tierlift --help`` stays fast and Ray stays optional.
"""
