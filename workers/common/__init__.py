"""What every worker kind shares: the application shell and the ping handler."""
