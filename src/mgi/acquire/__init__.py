"""acquire stage."""
