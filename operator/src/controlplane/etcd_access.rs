//! Who may do what in etcd: one role per component, each with only the key ranges it
//! needs, set up idempotently before etcd's authentication is switched on.
//!
//! | user (= role) | rights |
//! | --- | --- |
//! | `nimbus-gateway` | read `/nimbus/`; write its registration `/nimbus/gateways/` and hold acknowledgements `/nimbus/holds/` |
//! | `nimbus-operator` | read and write `/nimbus/` (routes, users, limits, migrations) |
//! | `root` | etcd's administrator: used only to set this up |
//!
//! With TLS client certificates (the Helm chart) a certificate's common name is its user,
//! and the users have no password; in the playground they have passwords.

use etcd_client::{Client, Permission, UserAddOptions};
use nimbus_api::etcd::{GATEWAYS, HOLDS, PREFIX};

pub const GATEWAY_USER: &str = "nimbus-gateway";
pub const OPERATOR_USER: &str = "nimbus-operator";
pub const ROOT_USER: &str = "root";

/// The permissions of each component's role.
pub fn roles() -> Vec<(&'static str, Vec<Permission>)> {
    vec![
        (
            GATEWAY_USER,
            vec![
                Permission::read(PREFIX).with_prefix(),
                Permission::read_write(GATEWAYS).with_prefix(),
                Permission::read_write(HOLDS).with_prefix(),
            ],
        ),
        (OPERATOR_USER, vec![Permission::read_write(PREFIX).with_prefix()]),
    ]
}

/// A user to create: its name and password (`None`: certificate only).
pub struct User<'a> {
    pub name: &'a str,
    pub password: Option<&'a str>,
}

fn exists(e: &etcd_client::Error) -> bool {
    e.to_string().contains("already exists")
}

/// Creates the roles and users (root included) and switches authentication on. Safe to
/// run again: what exists is kept; permissions are granted again (a no-op).
/// `client` must be unauthenticated (auth still off) or authenticated as root.
pub async fn ensure(client: &mut Client, users: &[User<'_>]) -> Result<(), etcd_client::Error> {
    for (role, perms) in roles() {
        if let Err(e) = client.role_add(role).await
            && !exists(&e)
        {
            return Err(e);
        }
        for p in perms {
            client.role_grant_permission(role, p).await?;
        }
    }
    let root = users.iter().any(|u| u.name == ROOT_USER);
    if !root {
        // etcd refuses to enable authentication without a root user.
        return Err(etcd_client::Error::InvalidArgs("a root user is needed to enable authentication".into()));
    }
    for u in users {
        let added = match u.password {
            Some(p) => client.user_add(u.name, p, None).await,
            None => client.user_add(u.name, "", Some(UserAddOptions::new().with_no_pwd())).await,
        };
        if let Err(e) = added
            && !exists(&e)
        {
            return Err(e);
        }
        let role = if u.name == ROOT_USER { ROOT_USER } else { u.name };
        client.user_grant_role(u.name, role).await?;
    }
    client.auth_enable().await?;
    Ok(())
}
