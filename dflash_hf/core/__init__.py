"""The portable core: the files copied into every published drafter and loaded there as remote code.

They import only torch, transformers and each other (relative imports), so a drafter folder runs with
``trust_remote_code=True`` where dflash-hf is not installed. Every module here except this one ships
(``dflash_hf.tools.hub.core_files``); nothing outside this folder ships, and nothing here imports from outside it.
"""
