"""Click commands only: parse, call a library function, print with rich."""
