"""The outer loop across TawPipe replicas: DiLoCo and SparseLoCo (see ``outer/loop.py``)."""
