//! The units the supervisor keeps running through systemd: which units make the managed
//! set ([`managed_set`]) and which control replicas run on this node ([`placement`]); the
//! event loop that keeps them up ([`keeper`]) with its pure heal policy ([`heal`]); the
//! D-Bus connection to systemd ([`systemd`]), the readiness probes ([`probe`]) and the
//! last journal lines of a unit being healed ([`journal`]). What
//! each unit is to Pimesh (the proxy, a control replica) is its [`role::UnitRole`].

pub mod heal;
pub mod journal;
pub mod keeper;
pub mod managed_set;
pub mod placement;
pub mod probe;
pub mod role;
pub mod systemd;
