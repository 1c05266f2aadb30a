"""Lightning callbacks and the Trainer plugin of normdecouple.

The one package of this distribution that imports ``pytorch_lightning``; it is filled by the Lightning issue.
"""

__all__: list[str] = []
