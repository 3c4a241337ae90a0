"""Face verification protocols: the insightface ``.bin`` sets and IJB-B/IJB-C 1:1.

``verification`` (``load_bin``, ``evaluate``, ``verify_model``) runs the LFW-style
10-fold accuracy-with-flip protocol, also inside training for periodic validation;
``ijb`` (``tar_at_far``, template features, pair scores) runs IJB-B/IJB-C;
``python -m lafs.eval verify|ijb`` is the command line.
"""
