"""Tests of each GPU provider adapter against its fake or simulator."""
