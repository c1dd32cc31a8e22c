"""The tools on top of the library: the demo, benchmarks and suites, verify-cost calibration, the draft-dtype
choice, and Hub export (model card, serving contract) and publishing. The command line (``dflash_hf.cli``) parses
and calls into these and the training layer."""
