"""Starting ranks: the ``tierlift`` CLI and the local, Ray and MPI launchers.  The torchrun
environment they hand each rank is ``tierlift.parallel.env``, which the ranks read too.

Nothing is imported here, so ``tierlift --help`` stays fast and Ray stays optional.
"""
