"""Who is calling: tokens, passwords, API keys, and the checks both front doors share."""
