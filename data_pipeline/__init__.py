"""data_pipeline: see DESIGN.md; built by its own issue."""
