"""The HTML report of a work directory (`--mode=report`; also written at the end of training)."""
