"""Regenerate the shipped default drafter folder (hub_upload/SmolLM2-135M-Instruct-DFlash) from dflash_hf/core/.

Re-exports the folder from its own weights, bench JSON and recipe, so its modules become the current core and its
model card the current template. Run it after changing anything in dflash_hf/core/; tests/test_hub_upload.py fails
until the copy matches.

    python scripts/refresh_shipped_drafter.py
"""

from dflash_hf.tools.hub import export_shipped_drafter

if __name__ == "__main__":
    print(f"refreshed {export_shipped_drafter()}")
