"""--mode=ablate: complexify (or remove) one thing at a time, over seeds, with hypotheses."""
