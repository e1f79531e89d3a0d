//! The node itself: what the seed on its boot partition says ([`seed`]), the facts the
//! supervisor reads but does not change ([`facts`], [`interfaces`]), and the changes it
//! makes from the seed at every start ([`setup`]).

pub mod facts;
pub mod interfaces;
pub mod seed;
pub mod setup;
