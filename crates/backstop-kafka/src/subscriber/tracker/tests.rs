use super::*;

#[test]
fn commits_only_up_to_the_lowest_unfinished_offset() {
    let mut t = Tracker::default();
    let g = (10..15).map(|o| t.delivered("t", 0, o).0).last().unwrap();
    assert_eq!(t.acked("t", 0, 12, g), Settled::Nothing);
    assert_eq!(t.acked("t", 0, 11, g), Settled::Nothing);
    assert_eq!(t.acked("t", 0, 10, g), Settled::Store(13));
    assert_eq!(t.acked("t", 0, 14, g), Settled::Nothing);
    assert_eq!(t.acked("t", 0, 13, g), Settled::Store(15));
}

#[test]
fn stores_are_handed_over_in_steps_and_all_at_a_flush() {
    let mut t = Tracker::default();
    let g = (0..10).map(|o| t.delivered("t", 0, o).0).last().unwrap();
    t.delivered("u", 1, 0);
    for o in 0..3 {
        t.acked("t", 0, o, g);
    }
    assert_eq!(t.take_flush("t", 0, 4), None, "3 past the last flush");
    t.acked("t", 0, 3, g);
    assert_eq!(t.take_flush("t", 0, 4), Some(4));
    t.acked("t", 0, 4, g);
    assert_eq!(t.take_flushes(), vec![("t".to_owned(), 0, 5)]);
    assert!(t.take_flushes().is_empty(), "nothing new");
}

#[test]
fn a_nack_holds_the_watermark_until_the_offset_comes_back() {
    let mut t = Tracker::default();
    let g = (0..4).map(|o| t.delivered("t", 0, o).0).last().unwrap();
    assert_eq!(t.acked("t", 0, 0, g), Settled::Store(1));
    assert_eq!(t.nacked("t", 0, 2, g), Some(2));
    assert_eq!(t.acked("t", 0, 1, g), Settled::Store(2));
    assert_eq!(
        t.acked("t", 0, 3, g),
        Settled::Nothing,
        "3 done but 2 is not"
    );
    // A later nack at a higher offset does not skip the lower one.
    t.delivered("t", 0, 4);
    assert_eq!(t.nacked("t", 0, 4, g), Some(2));
    // Redelivery from 2 on.
    for o in 2..5 {
        let (_, again) = t.delivered("t", 0, o);
        assert!(again, "offsets 2..5 were delivered before");
    }
    assert_eq!(t.committable("t", 0), Some(2));
    for o in 2..5 {
        t.acked("t", 0, o, g);
    }
    assert_eq!(t.committable("t", 0), Some(5));
}

#[test]
fn one_at_a_time_and_only_the_rewound_offset_after_a_nack() {
    let mut t = Tracker::default();
    assert!(t.may_deliver("t", 0, 0));
    let (g, _) = t.delivered("t", 0, 0);
    assert!(!t.may_deliver("t", 0, 1), "partition busy");
    t.acked("t", 0, 0, g);
    assert!(t.may_deliver("t", 0, 1));
    t.delivered("t", 0, 1);
    t.nacked("t", 0, 1, g);
    assert!(
        !t.may_deliver("t", 0, 2),
        "a stale buffered message must wait"
    );
    assert!(t.may_deliver("t", 0, 1));
    t.delivered("t", 0, 1);
    t.acked("t", 0, 1, g);
    assert!(t.may_deliver("t", 0, 2));
}

#[test]
fn a_take_records_only_what_may_go_under_the_current_epoch() {
    let mut t = Tracker::default();
    t.assign([("t".to_owned(), 0)]);
    let epoch = t.epoch("t", 0).unwrap();
    assert_eq!(t.take(("t", 0), epoch + 1, 0, None, 1), None, "stale lane");
    let (g, again) = t.take(("t", 0), epoch, 0, None, 1).unwrap();
    assert!(!again);
    assert_eq!(t.take(("t", 0), epoch, 1, None, 1), None, "busy");
    assert_eq!(t.committable("t", 0), Some(0), "1 was not recorded");
    assert_eq!(t.acked_flush(("t", 0), 0, g, 1), Some(1));
    let (_, again) = t.take(("t", 0), epoch, 1, Some(&b"k"[..]), 2).unwrap();
    assert!(!again);
    assert_eq!(
        t.take(("t", 0), epoch, 2, Some(&b"k"[..]), 2),
        None,
        "its key is in flight"
    );
    assert!(t.take(("t", 0), epoch, 2, Some(&b"j"[..]), 2).is_some());
}

#[test]
fn acks_hand_the_watermark_over_in_steps() {
    let mut t = Tracker::default();
    t.assign([("t".to_owned(), 0)]);
    let epoch = t.epoch("t", 0).unwrap();
    let mut g = 0;
    for o in 0..5 {
        g = t.take(("t", 0), epoch, o, None, 1).unwrap().0;
        let flushed = t.acked_flush(("t", 0), o, g, 2);
        assert_eq!(flushed, (o % 2 == 1).then_some(o + 1), "offset {o}");
    }
    assert_eq!(t.take_flushes(), vec![("t".to_owned(), 0, 5)]);
    assert_eq!(t.acked_flush(("t", 0), 9, g + 1, 1), None, "stale");
}

#[test]
fn duplicate_deliveries_of_one_offset_are_counted() {
    let mut t = Tracker::default();
    let (g, first) = t.delivered("t", 0, 7);
    let (_, second) = t.delivered("t", 0, 7);
    assert!(!first && second);
    assert_eq!(t.acked("t", 0, 7, g), Settled::Nothing);
    assert_eq!(t.acked("t", 0, 7, g), Settled::Store(8));
}

#[test]
fn acks_from_a_revoked_assignment_are_ignored() {
    let mut t = Tracker::default();
    t.assign([("t".to_owned(), 0)]);
    let (old, _) = t.delivered("t", 0, 5);
    t.revoke([("t".to_owned(), 0)]);
    assert!(!t.is_assigned("t", 0));
    t.assign([("t".to_owned(), 0)]);
    let (new, again) = t.delivered("t", 0, 5);
    assert!(!again, "a new assignment starts afresh");
    assert_ne!(old, new);
    assert_eq!(t.acked("t", 0, 5, old), Settled::Stale);
    assert_eq!(t.acked("t", 0, 5, new), Settled::Store(6));
}

#[test]
fn a_released_delivery_frees_its_partition_but_holds_the_watermark() {
    let mut t = Tracker::default();
    let (g, _) = t.delivered_keyed("t", 0, 0, Some(&b"a"[..]));
    assert!(!t.may_deliver("t", 0, 1), "partition busy");
    t.release("t", 0, 0, g);
    assert!(t.may_deliver("t", 0, 1), "released: the next may go");
    assert!(
        t.may_deliver_keyed("t", 0, 1, Some(&b"a"[..]), 2),
        "and its key is free"
    );
    t.delivered("t", 0, 1);
    assert_eq!(t.acked("t", 0, 1, g), Settled::Nothing, "0 still unsettled");
    assert!(t.may_deliver("t", 0, 2), "1 settled, 0 released");
    assert_eq!(t.acked("t", 0, 0, g), Settled::Store(2));
    assert_eq!(t.committable("t", 0), Some(2));
}

#[test]
fn with_partition_concurrency_keys_never_overlap() {
    let mut t = Tracker::default();
    let (a, b) = (Some(&b"a"[..]), Some(&b"b"[..]));
    assert!(t.may_deliver_keyed("t", 0, 0, a, 3));
    let (g, _) = t.delivered_keyed("t", 0, 0, a);
    assert!(!t.may_deliver_keyed("t", 0, 1, a, 3), "key a is in flight");
    assert!(t.may_deliver_keyed("t", 0, 1, b, 3), "another key may go");
    t.delivered_keyed("t", 0, 1, b);
    assert!(t.may_deliver_keyed("t", 0, 2, None, 3), "keyless may go");
    t.delivered_keyed("t", 0, 2, None);
    assert!(
        !t.may_deliver_keyed("t", 0, 3, Some(&b"c"[..]), 3),
        "limit reached"
    );
    assert!(
        !t.may_deliver_keyed("t", 0, 3, b, 1),
        "limit 1: one at a time"
    );
    // Out-of-order completion: the watermark waits for the lowest.
    assert_eq!(t.acked("t", 0, 1, g), Settled::Nothing);
    assert!(t.may_deliver_keyed("t", 0, 3, b, 3), "key b is free again");
    assert_eq!(t.acked("t", 0, 0, g), Settled::Store(2));
    assert!(t.may_deliver_keyed("t", 0, 3, a, 3), "key a is free again");
}
