"""--mode=label: the human baseline (terminal labelling interface, DIR/human.json)."""
