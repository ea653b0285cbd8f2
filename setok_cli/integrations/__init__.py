"""SeTok inside models it did not train: drop-in visual-token reducers (integrations/reducers.py)
and the LLaVA-1.5 patch that puts them in a model (integrations/llava.py)."""
