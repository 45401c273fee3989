"""jisu: compress, run, measure and serve language models fast."""
__version__ = "0.1.0"
