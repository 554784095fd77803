"""The editstack judge service: a transformers VLM judge scoring image edits with versioned rubrics."""
