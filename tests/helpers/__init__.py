"""Helpers the tests share (pytest puts ``tests/`` on ``sys.path``: ``from helpers.margin import ...``).

* ``margin``     the dense float64 margin-softmax reference, test inputs and ``GRAD_SCALE``
* ``eval_data``  verification .bin files, loose face crops, a tiny IJB folder, a tiny face model
* ``models``     the original repository's key names, synthetic photos, weights that move the landmarks

Test files import from here, never from each other.
"""
