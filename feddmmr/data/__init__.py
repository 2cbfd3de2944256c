"""The data layer: raw sources, the prepared split, the embedded demo."""
