"""Recipe stage 5, 'Tune': random search coarse to fine (`--mode=search`, its workers) and the
learning-rate range test (`--mode=lr_find`)."""
