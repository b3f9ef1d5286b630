"""What trains a converted model: one recipe module per method (`fit(model, train, val, cfg, out_dir)`),
the shared pieces in `finetune.py`, PLANER's latency table in `latency_table.py`. Recipes import the
methods, never the reverse."""
