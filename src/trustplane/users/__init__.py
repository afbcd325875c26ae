"""Local users: people who log in at the authorization endpoint and grant mandates."""
