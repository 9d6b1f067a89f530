//! What builds report while they run: progress and logs.

use super::*;

// ---- progress and logs ----

pub async fn the_latest_progress_report_per_group_wins_and_reads_back_as_a_tree(
    h: &Harness,
) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a"]).await?;
    let m = master(s, "m").await?;
    let build = built(s, b[0], m, vec![], ResultCode::Success, at(1)).await?;
    let report = |g: &[&str], current, total, status: &str| ProgressReport {
        group: g.iter().map(|x| x.to_string()).collect(),
        current,
        total,
        status: status.into(),
    };
    s.progress_report(build.id, &report(&["compile", "a"], 1, 10, "a 1"), at(1))
        .await?;
    s.progress_report(build.id, &report(&["compile", "b"], 2, 5, "b 2"), at(2))
        .await?;
    s.progress_report(build.id, &report(&["test"], 0, 3, "t"), at(3))
        .await?;
    s.progress_report(build.id, &report(&["compile", "a"], 7, 10, "a 7"), at(4))
        .await?;
    let records = s.progress_list(build.id).await?;
    ensure!(records.len() == 3, "one record per group");
    ensure!(
        records[0].report == report(&["compile", "a"], 7, 10, "a 7")
            && records[0].updated_at == at(4),
        "latest wins, first order kept"
    );
    let tree = ProgressNode::tree(&records);
    ensure!((tree.current, tree.total) == (9, 18), "{tree:?}");
    ensure!(
        tree.children[0].name == "compile"
            && (tree.children[0].current, tree.children[0].total) == (9, 15)
    );
    ensure!(tree.children[0].children[0].status.as_deref() == Some("a 7"));
    ensure!(matches!(
        s.progress_report(build.id, &report(&["", "x"], 1, 1, ""), at(5))
            .await,
        Err(StorageError::Invalid(_))
    ));
    ensure!(matches!(
        s.progress_report(BuildId(99_999), &report(&["x"], 1, 1, ""), at(5))
            .await,
        Err(StorageError::NotFound { .. })
    ));
    Ok(())
}

pub async fn logs_read_back_filtered_by_build_level_and_time_window(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a"]).await?;
    let m = master(s, "m").await?;
    let one = built(s, b[0], m, vec![], ResultCode::Success, at(1)).await?;
    let two = built(s, b[0], m, vec![], ResultCode::Success, at(1)).await?;
    let rec = |second, level, message: &str| {
        let mut fields = serde_json::Map::new();
        fields.insert("step".into(), json!(message));
        LogRecord {
            at: at(second),
            level,
            message: message.into(),
            fields,
        }
    };
    s.log_append(
        one.id,
        &[
            rec(1, LogLevel::Debug, "d"),
            rec(2, LogLevel::Info, "i"),
            rec(3, LogLevel::Warning, "w"),
        ],
    )
    .await?;
    s.log_append(two.id, &[rec(2, LogLevel::Error, "e")])
        .await?;
    s.log_append(one.id, &[rec(4, LogLevel::Critical, "c")])
        .await?;
    let messages = |q: LogQuery| async move {
        s.log_list(&q)
            .await
            .map(|v| v.into_iter().map(|e| e.record.message).collect::<Vec<_>>())
    };
    ensure!(
        messages(LogQuery {
            build_id: Some(one.id),
            ..Default::default()
        })
        .await?
            == ["d", "i", "w", "c"]
    );
    ensure!(
        messages(LogQuery {
            build_id: Some(one.id),
            min_level: Some(LogLevel::Warning),
            ..Default::default()
        })
        .await?
            == ["w", "c"]
    );
    ensure!(
        messages(LogQuery {
            since: Some(at(2)),
            until: Some(at(4)),
            ..Default::default()
        })
        .await?
            == ["i", "w", "e"]
    );
    ensure!(
        messages(LogQuery {
            limit: Some(2),
            ..Default::default()
        })
        .await?
            == ["d", "i"]
    );
    let all = s.log_list(&LogQuery::default()).await?;
    ensure!(
        all[0].record.fields["step"] == json!("d")
            && all[0].record.at == at(1)
            && all[0].build_id == one.id
    );
    let after = messages(LogQuery {
        after_id: Some(all[2].id),
        ..Default::default()
    })
    .await?;
    ensure!(after == ["e", "c"], "tailing after an id: {after:?}");
    ensure!(matches!(
        s.log_append(BuildId(99_999), &[rec(1, LogLevel::Info, "x")])
            .await,
        Err(StorageError::NotFound { .. })
    ));
    Ok(())
}

pub async fn pruning_logs_removes_old_records_below_a_level(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a"]).await?;
    let m = master(s, "m").await?;
    let build = built(s, b[0], m, vec![], ResultCode::Success, at(1)).await?;
    let rec = |second, level| LogRecord {
        at: at(second),
        level,
        message: format!("{level}@{second}"),
        fields: Default::default(),
    };
    s.log_append(
        build.id,
        &[
            rec(1, LogLevel::Debug),
            rec(1, LogLevel::Warning),
            rec(1, LogLevel::Error),
            rec(9, LogLevel::Debug),
        ],
    )
    .await?;
    let gone = s.log_prune(at(5), LogLevel::Error).await?;
    ensure!(gone == 2, "old debug and warning went: {gone}");
    let left: Vec<String> = s
        .log_list(&LogQuery::default())
        .await?
        .into_iter()
        .map(|e| e.record.message)
        .collect();
    ensure!(left == ["error@1", "debug@9"], "{left:?}");
    Ok(())
}
