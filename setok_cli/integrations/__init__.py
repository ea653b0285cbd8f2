"""SeTok inside models it did not train: drop-in visual-token reducers (integrations/llava.py)."""
