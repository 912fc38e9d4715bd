"""``medseg evaluate``: :mod:`.runner` (the case loop, failures and tables) over
:mod:`.files` (each case's prediction and reference files read and checked); the scores
themselves are :mod:`medseg.metrics`."""
