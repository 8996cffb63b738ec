"""Model-card templates, installed as the `diffusers_delta.hub_cards` package (see setup.py)."""
