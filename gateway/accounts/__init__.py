"""Users and their sessions, kept in SQL; written off the hot path (register, login, refresh)."""
