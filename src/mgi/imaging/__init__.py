"""imaging stage."""
