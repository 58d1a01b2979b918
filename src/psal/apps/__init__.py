"""Zero-shot image editing with PSAL as the matching and aggregation engine (no trained weights)."""
