"""Federation: the partner trust registry and the assertions partners' issuers sign."""
