"""The billing worker: the ledger, payments, spending windows and budget holds.

Today it answers pings; the billing commands join it on the same consumer.
"""
