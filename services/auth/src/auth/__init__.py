"""Accounts and password login sessions."""
