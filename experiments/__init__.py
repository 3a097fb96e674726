"""Experiments that run the training app over grids of embedding settings (``python experiments/grid.py``)."""
