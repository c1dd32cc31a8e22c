"""Training drafters: regenerated data, prompt sources, features and the trainer, the pipeline behind
``dflash-hf train``, recorded traffic and adaptation to it, the campaign, the vLLM server helper, and loading the
offline default pair. It builds on the core and the shared utilities, never on the tools above it."""
