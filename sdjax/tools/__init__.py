"""Command-line tools that prepare files for sdjax (they may need torch when run)."""
