"""The item features: text (SBERT) and visual (CLIP) extraction and the feature store."""
