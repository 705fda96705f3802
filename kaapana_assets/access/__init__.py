"""Who is asking: the identity a request carries (user, roles, projects) from an OpenID Connect
token's claims, the header the gateway signs it into for the services behind it, the project
scope it reads through, and the audit trail of its accesses to patient data."""
