"""Database access shared by every component: engine, metadata, migrations, the group-commit writer."""
