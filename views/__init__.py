"""HTML views of runs and queries: self-contained pages with embedded thumbnails."""
