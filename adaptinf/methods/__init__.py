"""One file per method: its config, building blocks, conversion from dense and model (forward, knob,
cost). Nothing here trains or touches disk: the recipes (`adaptinf.recipes`) do, and the catalogue
(`adaptinf.registry`) lists every method. Importing this package imports no method."""
