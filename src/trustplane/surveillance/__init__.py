"""Surveillance signals over the audit ledger (docs/surveillance.md): unusual delegation, partner
claim failures and issuance spikes, each raised as a ``surveillance:alert:raised`` ledger event."""
