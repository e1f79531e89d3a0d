//! A vehicle's position report: what the simulator publishes, one JSON object per line,
//! and what the tracker keeps and serves.

use serde::{Deserialize, Serialize};

/// The longest vehicle name accepted.
pub const MAX_NAME: usize = 64;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Position {
    pub vehicle: String,
    pub lat: f64,
    pub lon: f64,
    /// Milliseconds since the Unix epoch.
    pub at: u64,
    #[serde(default)]
    pub speed_kmh: f64,
}

/// A vehicle name as it may appear in a path: 1 to [`MAX_NAME`] of `[A-Za-z0-9_-]`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl Position {
    /// Parses and checks one line from the queue.
    ///
    /// # Errors
    /// When the line is not a position, or its name or coordinates are out of range.
    pub fn parse(line: &[u8]) -> Result<Position, String> {
        let position: Position =
            serde_json::from_slice(line).map_err(|err| format!("not a position: {err}"))?;
        if !valid_name(&position.vehicle) {
            return Err(format!("bad vehicle name {:?}", position.vehicle));
        }
        if !(position.lat.is_finite()
            && position.lon.is_finite()
            && (-90.0..=90.0).contains(&position.lat)
            && (-180.0..=180.0).contains(&position.lon))
        {
            return Err(format!(
                "{}: coordinates out of range ({}, {})",
                position.vehicle, position.lat, position.lon
            ));
        }
        Ok(position)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_good_lines_and_names_what_is_wrong_with_bad_ones() {
        let good = br#"{"vehicle":"truck-01","lat":53.38,"lon":-1.47,"at":1}"#;
        assert_eq!(
            Position::parse(good).map(|p| p.vehicle),
            Ok("truck-01".into())
        );
        let bad_name = br#"{"vehicle":"<b>","lat":53.38,"lon":-1.47,"at":1}"#;
        assert!(Position::parse(bad_name).is_err_and(|e| e.contains("bad vehicle name")));
        let far = br#"{"vehicle":"t","lat":91,"lon":0,"at":1}"#;
        assert!(Position::parse(far).is_err_and(|e| e.contains("out of range")));
        assert!(Position::parse(b"nope").is_err());
    }
}
